"""Plots layer: drawing from data only. Every function takes a Dataset (or tensors) and returns a
figure; none reads files or computes more than a mean. May import the layers below (the surface and
cache names it labels with), never the CLIs.

* ``surfaces``: surfaces in 3D, contour and heatmap (matplotlib, seaborn) and plotly HTML;
* ``analysis``: correlation scatter, feature-dynamics heat map, spectral norms;
* ``cache``: quality against speedup, the teaser's cosine-against-timestep curves;
* ``samples``: sample grids, video frame strips and GIFs, training-loss curves;
* ``plan``: planned cache schedules against the references (figure (i)).
"""
