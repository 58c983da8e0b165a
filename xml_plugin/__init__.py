"""xml_plugin: cross-batch metric learning (XML), GSP and XBN/AXBN under the fair-comparison protocol."""
from .registry import build, get, names, register, unregister, UnknownComponentError


def load_model(run_dir, device: str = "cpu"):
    """The saved model of a run folder (``runs/<method>/<hash>``, see ``runs/index.csv``); ``.embed(paths)`` embeds
    images. See :func:`xml_plugin.api.load_model`."""
    from .api import load_model as _load
    return _load(run_dir, device)


__version__ = "0.1.0"
__all__ = ["load_model", "register", "unregister", "get", "names", "build", "UnknownComponentError", "__version__"]
