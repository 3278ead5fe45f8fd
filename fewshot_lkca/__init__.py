"""fewshot_lkca."""
