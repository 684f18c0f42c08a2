from __future__ import annotations

from django.contrib import admin

from messaging.models import APIKey, MessageJob

admin.site.register(MessageJob)
