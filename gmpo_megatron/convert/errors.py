"""The one exception the converters raise when they refuse to produce a possibly wrong result."""


class ConversionError(ValueError):
    """A checkpoint, config or output directory that the converters will not use or overwrite.

    The message names the offending tensor, field or path, and the fix. The CLI prints it and exits
    with status 2, having written nothing that looks complete.
    """
