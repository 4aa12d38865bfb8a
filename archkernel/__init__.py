"""archkernel: put Arch Linux where cloud providers do not support it out of the box.

The package is the library: binary formats, I/O helpers and each workflow's logic as
plain functions of settings and paths. It never imports doit; `tasks/` turns it into
numbered doit steps.
"""

__version__ = "0.1.0"
