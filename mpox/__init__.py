"""The machinery of monkeypox.py, one module per concern (see each module's docstring). This file imports
none of them: the import graph is the modules' own."""
