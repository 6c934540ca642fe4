"""The methods, each whole in one place: a sub-package with its recipe schema and `SPEC` (light:
no torch) in `__init__.py`, its `Method` in `method.py` and its losses and programs beside it.
The engine finds them through the `distill.methods` entry points in pyproject.toml; the YAML
recipes users start from are in `recipes/configs/`."""
