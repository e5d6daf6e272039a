"""spectral-dip: the deep image prior, its spectral bias, and how to measure and control it.

Shi, Mettes, Maji, Snoek, "On Measuring and Controlling the Spectral Bias of the Deep Image Prior",
IJCV 130(4):885-908, 2022.
"""
