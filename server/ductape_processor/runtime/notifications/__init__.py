"""Notifications: a product's messages rendered from their templates and sent on each channel a call asks for
(`sender.NotificationRuntime`). Import each part from its module; the package re-exports nothing."""
