"""mobilepay-proxy: an authenticating reverse proxy from PoS terminals to MobilePay PoS V10."""

__version__ = "0.1.0"
