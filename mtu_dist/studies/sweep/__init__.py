"""Scaling studies: a grid of cells (world size x data size x forget fraction x method), each one a
child MLflow run of the sweep's parent run. `grid.py` reads the grid, `launchers.py` builds each
cell's launch command, `driver.py` runs the cells resumably."""
