"""``python -m fewshot_lkca.export``."""
from .cli import main

main()
