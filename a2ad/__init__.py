"""a2ad: the A2A delivery daemon. Embed it with `create_app(Settings(...))`."""

from .app import create_app
from .settings import Settings, load_settings

__all__ = ["Settings", "create_app", "load_settings"]
__version__ = "0.1.0"
