import sys

from tokenizer.cli import main

sys.exit(main())
