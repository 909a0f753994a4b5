"""Sorting-free Triton samplers: one program per row (`row`), a row split over several programs (`split`),
threshold filters and softmax (`filters`), chain speculative sampling (`speculative`), and the Philox race and
k-th value helpers they share (`race`, `kth`)."""
