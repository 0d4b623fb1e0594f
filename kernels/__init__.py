"""fastsae's Triton kernels, installed as ``fastsae.kernels`` (this directory sits at the top of
the repository).

Run from a checkout, the repository root is on ``sys.path`` (``python -m ...`` puts the working
directory there, pytest its root), so ``import kernels`` anywhere finds this directory first.
Hugging Face's ``kernels`` distribution, which ``transformers`` >= 5.25 requires and imports,
would then be shadowed and transformers fails to import. So when this file is imported under the
bare name ``kernels`` it hands the name to the installed distribution, or, without one, raises
the ModuleNotFoundError that ``import kernels`` would raise without this checkout.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here and p != _here]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
