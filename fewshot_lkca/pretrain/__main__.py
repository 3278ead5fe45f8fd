"""``python -m fewshot_lkca.pretrain``."""
from .cli import main

main()
