"""thawctl: the `thaw` command and the runners that execute the compiled pipeline.

It sits above the layers: it compiles through `pipelines/`, runs steps whose code is in
`components/`, and calls the library `thaw/`, which itself never imports any of them.
"""
