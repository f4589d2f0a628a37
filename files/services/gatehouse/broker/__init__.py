"""The Gatehouse connection broker: users, desktops, pools, entitlements, placement and the admin API."""
