"""napari faces of napari-diffmix: dock widgets and the layer conventions they share.

Nothing here holds an algorithm: widgets gather settings, call the core functions and show
the results. Importing this package imports neither Qt nor napari; the widget modules do.
"""
