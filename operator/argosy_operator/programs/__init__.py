"""Small programs the operator renders into the pods of a multi-node group.

They run inside the vLLM image (its Python, its Ray), not in the operator: each is a
standalone script that imports nothing from argosy_operator, read as text by
group_builders.py and also importable here so it can be tested on its own.
"""

from importlib import resources


def source(name: str) -> str:
    """The code of programs/<name>.py as it is rendered into a pod: without its docstring (the
    file is the documentation), headed by a comment naming the file."""
    text = resources.files(__name__).joinpath(f"{name}.py").read_text(encoding="utf-8")
    if text.startswith('"""'):
        text = text.split('"""', 2)[2].lstrip("\n")
    return f"# argosy_operator/programs/{name}.py\n{text}"
