"""One file per delta method; each registers itself with ``@register``.

The registry imports every module in this folder, so a new method is a new file here plus its
tests; nothing else needs to know its name.
"""
