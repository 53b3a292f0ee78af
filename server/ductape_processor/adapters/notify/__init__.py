"""Notification providers, one module per provider behind one channel interface (`base.ChannelAdapter`), found
through `registry.NOTIFICATION_PROVIDERS`."""
