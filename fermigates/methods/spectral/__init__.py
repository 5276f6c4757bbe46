"""Spectral layers (Giambagli et al. 2021; Buffoni et al. 2022): a Linear layer written through the eigenvectors
and eigenvalues of the adjacency matrix of the two layers of nodes it connects, ``w_ij = phi_ij * (lambda_start_j -
lambda_end_i)``; nodes ranked by their eigenvalues and removed through the shared allocation and shrink.

``options`` the options (``SpectralOptions``); ``layers`` the spectral twins of Linear and Linear-like layers;
``nodes`` the node groups the eigenvalues judge and their scores; ``optim`` the trained parts and
``SpectralOptimizer``; ``method`` the method behind the shared interface; ``workflows`` ``spectral_prune``,
``spectral_pretrain`` and ``spectral_distill``.
"""

from ..registry import register_method
from .method import SpectralMethod

register_method(SpectralMethod())
