"""Where a step's work runs. ``local``: the step functions in this process against the
store (the default); ``in-db``: the same functions inside PostgreSQL, called as procedures
(:func:`imgsim.pipeline.run_in_database`, :mod:`imgsim.indb`); ``ray``: featurize's
decoding and inference spread over a Ray cluster (:mod:`imgsim.compute.ray_featurize`)."""
