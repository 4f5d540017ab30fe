"""The ``overlaycni`` command line (typer + rich). Entry points only parse,
dispatch and format; the work lives in the layers below."""
