"""xml_plugin: cross-batch metric learning (XML), GSP and XBN/AXBN under the fair-comparison protocol."""
from .registry import build, get, names, register, unregister, UnknownComponentError

__version__ = "0.1.0"
__all__ = ["register", "unregister", "get", "names", "build", "UnknownComponentError", "__version__"]
