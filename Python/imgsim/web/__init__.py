"""The web page and REST API of ``imgsim serve`` (:mod:`imgsim.web.app`).

``templates/`` holds the pages; ``results.html`` is also the file ``imgsim report`` writes
(:mod:`imgsim.report`). ``static/`` holds the style sheet (inlined into every page, so the
file stands alone) and the little script of the search page.
"""
