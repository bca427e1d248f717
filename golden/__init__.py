"""sparsec's golden reference models (tiny-gpt, tiny-moe, digits): see README.md, models.py, data.py, evaluate.py."""
