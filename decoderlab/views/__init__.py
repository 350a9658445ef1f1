"""What a person looks at: figures (`plots`, fonts in `fonts`), the offline HTML page (`html`), the panels the
widgets share (`panels`), and the Jupyter views (trace view, session explorer, compare view, playground).

Views read traces through their public frames and accessors only. Nothing is imported here, so that a view
(the HTML page, say) loads without matplotlib or ipywidgets.
"""
