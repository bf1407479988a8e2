"""evogrow's launchers: the gin-bound entry points that run.sh calls.

`main` (the CLI), `train`, `eval`, `infer`, `grow`, `t5x_growth` and `gin_utils` bind gin
configuration and call the libraries below them (`training`, `evolution`), which never
import gin.
"""
