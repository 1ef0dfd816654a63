import sys

from codebook_lens.cli.main import main

sys.exit(main())
