"""HTML reports: `cnclip corpus report` (a built corpus) and `cnclip train report` (a run).

page.py is the one template both use; charts.py draws with matplotlib to inline SVG; the data
comes from polars aggregations (corpus_data.py) and the run's log (train.py)."""
