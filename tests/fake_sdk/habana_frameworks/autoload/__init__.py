"""Stand-in for ``habana_frameworks.autoload`` (PyTorch >= 2.5 device autoload entry point).

The real package is loaded by torch through the ``torch.backends`` entry point of the
installed distribution; the fake has no distribution metadata, so torch never autoloads
it. ``habana_frameworks.torch`` sets ``is_loaded`` like the real one does.
"""

is_loaded = False
