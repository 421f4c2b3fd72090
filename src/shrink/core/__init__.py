"""The ground the parts stand on: errors, paths and switches, atomic writes and output folders (one owner of what
shrink may replace and of its temporaries' names), readers of the user's files, what a model is and where its
blocks are, memory checks. It imports nothing of shrink outside this folder."""

VERSION = "0.1.0"  # the package's version (pyproject.toml's); shrink.__version__ is this
