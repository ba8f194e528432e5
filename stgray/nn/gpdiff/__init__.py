"""GPDiff networks: per-node forecasting models (``pernode``) and the denoiser (``denoiser``)."""
