"""The efk editor: its settings (torch-free, read before anything loads) beside its code (``editor.py``)."""
