"""mednca-jax: Med-NCA (Kalkhof et al., IPMI 2023) as pure JAX functions."""
