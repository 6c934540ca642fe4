"""The toolkit's version, in a module of its own: `Manifest` records it, and the package's `__init__` imports
`manifest`, so the manifest cannot import it from the package without a circle."""

__version__ = "0.1.0"
