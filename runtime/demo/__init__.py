"""The embedded demo: hand/wrist radiograph phantoms the project generates itself
(:mod:`.phantoms`), dataset writers over them (:mod:`.synth`, ``gamguard data synth``) and the
calibrated demo bundle built from them (``bundle/``, :func:`gamguard.runtime.bundle.default_bundle_dir`).

Nothing here is needed to serve a real model; it is what makes ``gamguard demo`` and the tests work on
a fresh machine with no data and no network.
"""
