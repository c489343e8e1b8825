"""Per-merchant MobilePay access tokens: fetched once, cached, refreshed ahead of expiry."""
