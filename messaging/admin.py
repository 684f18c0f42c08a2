"""The admin: staff look at messages, cancel them, and manage API keys and webhooks.

Built for a table of a million messages: the list never counts the whole table, searches are
exact matches on indexed columns, filters never scan for their choices, and a message's page
shows a bounded number of its events. Messages are never edited here: every change of status
goes through `messaging.jobs`, like the API's.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from rest_framework_api_key.admin import APIKeyModelAdmin
from rest_framework_api_key.models import APIKey as LibraryAPIKey

from messaging import catalog, jobs, webhooks
from messaging.errors import Conflict
from messaging.models import ACTIVE_STATUSES, APIKey, MessageEvent, MessageJob, Status, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from messaging.serializers import split_secrets

# A message can have thousands of events (one per streamed token); its page shows the first ones.
EVENTS_SHOWN = 200
# The delete confirmation names this many messages and counts the rest.
DELETE_LISTED = 100
# Messages one "retry" action makes at most (each is a new message and a token).
RETRY_AT_ONCE = 100
# Columns no list row shows; loading them for 100 rows would read megabytes of JSON.
LIST_DEFERRED = ("request", "result", "error", "warnings")


class CappedCountPaginator(Paginator):
    """Counts at most `cap` + 1 rows, so a page of a million messages costs one short index scan.

    Past the cap, PostgreSQL's planner estimate stands in for an unfiltered count (one catalog
    read); otherwise the list says "more than 10,000". `count_text` is what the page shows
    instead of an exact number (None when the count is exact).
    """

    cap = 10_000
    _count_text: str | None = None

    @cached_property
    def count(self) -> int:  # type: ignore[override]
        queryset = self.object_list
        # COUNT(*) over a LIMITed subquery: stops after cap + 1 rows.
        counted = int(queryset.order_by()[: self.cap + 1].count())
        if counted <= self.cap:
            return counted
        estimate = _table_estimate(queryset)
        if estimate is not None and estimate > counted:
            self._count_text = f"about {estimate:,}"
            return estimate
        self._count_text = f"more than {self.cap:,}"
        return counted

    @property
    def count_text(self) -> str | None:
        self.count  # noqa: B018 -- computing the count decides the text
        return self._count_text


def _table_estimate(queryset: QuerySet[Any]) -> int | None:
    """pg_class.reltuples for an unfiltered queryset on PostgreSQL, else None."""
    connection = connections[queryset.db]
    if connection.vendor != "postgresql" or queryset.query.has_filters():
        return None
    with connection.cursor() as cursor:
        table = queryset.model._meta.db_table
        cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", [table])
        row = cursor.fetchone()
    # -1 means "never analyzed" (PostgreSQL 14+).
    return int(row[0]) if row and row[0] >= 0 else None


class ModelFilter(admin.SimpleListFilter):
    """The configured models, rather than a SELECT DISTINCT over a million rows."""

    title = "model"
    parameter_name = "model"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(model_id, model_id) for model_id in catalog.models()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(model=value) if value else queryset


def pretty_json(value: Any) -> SafeString:
    return format_html("<pre class=\"json\">{}</pre>", json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False))


def timestamp(value: datetime | None) -> str:
    if value is None:
        return "—"
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " " + timezone.get_current_timezone_name()


def format_duration(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def live_figures() -> list[tuple[str, str]]:
    """The queue at a glance, for the list's header: each figure one index scan (the partial
    indexes of pending and processing messages, status + created_at for recent failures)."""
    now = timezone.now()
    pending = MessageJob.objects.filter(status=Status.PENDING)
    oldest = pending.order_by("created_at").values_list("created_at", flat=True).first()
    hour_ago = now - timedelta(hours=1)
    # A message failing now was created at most a pending TTL and a run time ago.
    created_since = hour_ago - timedelta(seconds=settings.MESSAGING_PENDING_TTL + settings.MESSAGING_JOB_TIMEOUT)
    failed = MessageJob.objects.filter(status=Status.FAILED, created_at__gte=created_since, finished_at__gte=hour_ago)
    return [
        ("pending", _capped_count(pending)),
        ("processing", _capped_count(MessageJob.objects.filter(status=Status.PROCESSING))),
        ("failed in the last hour", _capped_count(failed)),
        ("oldest pending", format_duration(now - oldest) if oldest else "—"),
    ]


def _capped_count(queryset: QuerySet[Any]) -> str:
    """Counted as the list counts its rows: at most the paginator's cap, then "more than"."""
    cap = CappedCountPaginator.cap
    counted = queryset.order_by()[: cap + 1].count()
    return f"more than {cap:,}" if counted > cap else f"{counted:,}"


@admin.register(MessageJob)
class MessageJobAdmin(admin.ModelAdmin):
    list_display = ("message_id", "status", "model", "priority", "owner", "created", "duration")
    list_filter = ("status", ModelFilter, ("created_at", admin.DateFieldListFilter))
    # Shown in the search box; `get_search_results` matches them exactly, not with icontains.
    search_fields = ("message_id", "correlation_id")
    search_help_text = "An exact message_id or correlation_id."
    # Served by the job_created index; with a status filter, by job_status_created.
    ordering = ("-created_at", "-id")
    # Sorting by any other column would sort the whole table on every page load.
    sortable_by = ("created",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    paginator = CappedCountPaginator
    list_per_page = 100
    empty_value_display = "—"
    actions = ["cancel_selected", "retry_selected"]

    # `secrets` is in none of these, and excluded besides, so no page and no form can show it.
    exclude = ("secrets",)
    fieldsets = (
        (None, {"fields": ("message_id", "owner", "status", "model", "priority", "correlation_id")}),
        (
            "Timing",
            {"fields": ("created_time", "started_time", "finished_time", "duration", "attempts", "lease_expires_time")},
        ),
        ("Request", {"fields": ("request_json", "warnings_json")}),
        ("Result", {"fields": ("result_json", "error_json")}),
        ("Events", {"fields": ("events_list",)}),
    )
    readonly_fields = (
        "message_id",
        "owner",
        "status",
        "model",
        "priority",
        "correlation_id",
        "created_time",
        "started_time",
        "finished_time",
        "duration",
        "attempts",
        "lease_expires_time",
        "request_json",
        "warnings_json",
        "result_json",
        "error_json",
        "events_list",
    )

    # --- Permissions: messages come from the API and change only through the status machine.

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: MessageJob | None = None) -> bool:
        # A saved form would write back every column over a worker's concurrent writes.
        return False

    def has_delete_permission(self, request: HttpRequest, obj: MessageJob | None = None) -> bool:
        return bool(request.user.is_superuser)

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        # Cancelling is the one change staff can make, so it takes the model's change permission.
        return bool(request.user.has_perm("messaging.change_messagejob"))

    # --- The list ---------------------------------------------------------------------------------

    def get_queryset(self, request: HttpRequest) -> QuerySet[MessageJob]:
        queryset = super().get_queryset(request).defer("secrets")
        match = request.resolver_match
        if match is not None and match.url_name == "messaging_messagejob_changelist":
            queryset = queryset.defer(*LIST_DEFERRED)
        return queryset

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[MessageJob], search_term: str
    ) -> tuple[QuerySet[MessageJob], bool]:
        # Exact matches only: `=field` would be iexact (UPPER(...) on PostgreSQL), which the
        # job_message_id and job_correlation_id indexes cannot serve.
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(Q(message_id=term) | Q(correlation_id=term)), False

    @admin.display(description="created", ordering="created_at")
    def created(self, obj: MessageJob) -> str:
        # Compact and to the second, so a row stays on one line.
        return timezone.localtime(obj.created_at).strftime("%Y-%m-%d %H:%M:%S")

    @admin.display(description="duration")
    def duration(self, obj: MessageJob) -> str:
        if obj.started_at is None:
            return "—"
        if obj.finished_at is None:
            return "running"
        return format_duration(obj.finished_at - obj.started_at)

    @admin.action(description="Cancel selected messages", permissions=["cancel"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[MessageJob]) -> None:
        cancelled = jobs.cancel_many(queryset)
        if cancelled:
            noun = "message" if cancelled == 1 else "messages"
            self.message_user(
                request,
                f"Cancelled {cancelled} {noun}. Messages that had already finished were left as they were.",
                messages.SUCCESS,
            )
        else:
            self.message_user(
                request,
                "None of the selected messages was pending or processing; nothing was cancelled.",
                messages.WARNING,
            )

    @admin.action(description="Retry selected failed or errored messages (as new messages)", permissions=["cancel"])
    def retry_selected(self, request: HttpRequest, queryset: QuerySet[MessageJob]) -> None:
        retried = [
            (job.message_id, jobs.retry(job).message_id)
            for job in queryset.filter(status__in=(Status.FAILED, Status.ERROR)).order_by("created_at")[:RETRY_AT_ONCE]
        ]
        if not retried:
            self.message_user(request, "None of the selected messages had failed or ended in error; nothing was retried.", messages.WARNING)
            return
        pairs = ", ".join(f"{old} → {new}" for old, new in retried)
        noun = "message" if len(retried) == 1 else "messages"
        self.message_user(request, f"Retried {len(retried)} {noun} as new ones (a finished message never changes): {pairs}.", messages.SUCCESS)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        return super().changelist_view(request, {**(extra_context or {}), "figures": live_figures()})

    # --- A message's page -------------------------------------------------------------------------
    # Times to the millisecond: the order of a message's transitions is what staff look for.

    @admin.display(description="created at")
    def created_time(self, obj: MessageJob) -> str:
        return timestamp(obj.created_at)

    @admin.display(description="started at")
    def started_time(self, obj: MessageJob) -> str:
        return timestamp(obj.started_at)

    @admin.display(description="finished at")
    def finished_time(self, obj: MessageJob) -> str:
        return timestamp(obj.finished_at)

    @admin.display(description="lease expires at")
    def lease_expires_time(self, obj: MessageJob) -> str:
        return timestamp(obj.lease_expires_at)

    @admin.display(description="request")
    def request_json(self, obj: MessageJob) -> SafeString:
        # Stored already redacted; redacting again costs nothing and covers rows stored by
        # older code.
        request = split_secrets(obj.request)[0] if isinstance(obj.request, dict) else obj.request
        return pretty_json(request)

    @admin.display(description="warnings")
    def warnings_json(self, obj: MessageJob) -> SafeString:
        return pretty_json(obj.warnings)

    @admin.display(description="result")
    def result_json(self, obj: MessageJob) -> SafeString:
        return pretty_json(obj.result)

    @admin.display(description="error")
    def error_json(self, obj: MessageJob) -> SafeString:
        return pretty_json(obj.error)

    @admin.display(description="events")
    def events_list(self, obj: MessageJob) -> SafeString:
        # Served by the (job, sequence) unique index; last_sequence is the count without a COUNT.
        events = list(
            obj.events.order_by("sequence").values_list("sequence", "type", "created_at", "data")[:EVENTS_SHOWN]
        )
        if not events:
            return format_html("<p>{}</p>", "No events.")
        rows = format_html_join(
            "",
            '<tr><td>{}</td><td>{}</td><td class="nowrap" title="{}">{}</td><td>{}</td></tr>',
            (
                (sequence, type_, timestamp(created_at), timestamp(created_at)[11:23], pretty_json(data))
                for sequence, type_, created_at, data in events
            ),
        )
        table = format_html(
            '<table class="events"><thead><tr><th>#</th><th>type</th><th>created</th><th>data</th></tr></thead>'
            "<tbody>{}</tbody></table>",
            rows,
        )
        total = max(obj.last_sequence, len(events))
        if total <= len(events):
            return table
        return format_html(
            '<p class="events-note">Showing the first {} of {} events; {} more are not shown. '
            "The API's stream endpoint replays them all.</p>{}",
            len(events),
            total,
            total - len(events),
            table,
        )

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: MessageJob | None = None,
    ) -> HttpResponse:
        context["show_cancel"] = (
            obj is not None and obj.status in ACTIVE_STATUSES and self.has_cancel_permission(request)
        )
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)

    def get_urls(self) -> list[URLPattern]:
        cancel = path(
            "<path:object_id>/cancel/",
            self.admin_site.admin_view(self.cancel_view),
            name="messaging_messagejob_cancel",
        )
        # Before the stock patterns: their "<path:object_id>/" would swallow ".../cancel/".
        return [cancel, *super().get_urls()]

    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        # admin_view() already requires staff and checks the CSRF token.
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_cancel_permission(request):
            raise PermissionDenied
        job = self.get_object(request, unquote(object_id))
        if job is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        try:
            jobs.cancel(job)
        except Conflict as exc:
            self.message_user(request, str(exc.detail), messages.ERROR)
        else:
            self.log_change(request, job, "Cancelled.")
            self.message_user(request, f"Message {job.message_id} was cancelled.", messages.SUCCESS)
        return HttpResponseRedirect(
            reverse("admin:messaging_messagejob_change", args=[quote(job.pk)], current_app=self.admin_site.name)
        )

    def get_deleted_objects(
        self, objs: Any, request: HttpRequest
    ) -> tuple[list[Any], dict[str, int], set[str], list[Any]]:
        # Django's confirmation page lists every related row: thousands of events per message,
        # and every row of a "select all". Name the first messages and count the rest.
        if isinstance(objs, QuerySet):
            selected = objs.order_by()
            listed = list(selected.only("pk", "message_id")[:DELETE_LISTED])
            message_count = selected.count() if len(listed) == DELETE_LISTED else len(listed)
        else:
            listed = list(objs)
            message_count = len(listed)
            selected = MessageJob.objects.filter(pk__in=[obj.pk for obj in listed])
        to_delete: list[Any] = [
            format_html(
                '{}: <a href="{}">{}</a>',
                MessageJob._meta.verbose_name.capitalize(),
                reverse("admin:messaging_messagejob_change", args=[quote(obj.pk)], current_app=self.admin_site.name),
                obj.message_id,
            )
            for obj in listed
        ]
        if message_count > len(listed):
            to_delete.append(f"… and {message_count - len(listed)} more messages")
        event_count = MessageEvent.objects.filter(job__in=selected.values("pk")).count()
        model_count = {"messages": message_count, "message events": event_count}
        return to_delete, model_count, set(), []


admin.site.site_header = "Messaging administration"
admin.site.site_title = "Messaging admin"
admin.site.index_title = "Messages and API keys"
# The message list is wide (ids, times, filters); the sidebar would push columns off-screen.
admin.site.enable_nav_sidebar = False
# Nothing is served at "/": hide the admin's "View site" link rather than lead to a 404.
admin.site.site_url = None


# --- API keys -----------------------------------------------------------------------------------

# rest_framework_api_key registers its own APIKey model, which nothing here uses: a key made
# there would authenticate nobody. Keep only ours.
if admin.site.is_registered(LibraryAPIKey):
    admin.site.unregister(LibraryAPIKey)


@admin.register(APIKey)
class APIKeyAdmin(APIKeyModelAdmin):
    """Creating a key shows it once, in a message; after that only its hash is stored."""

    model = APIKey
    list_display = ("prefix", "name", "owner", "created", "expiry_date", "_has_expired", "revoked")
    list_filter = ("revoked", "created")
    search_fields = ("owner", "name", "prefix")
    fields = ("owner", "name", "prefix", "expiry_date", "revoked", "rate_limit_rpm", "max_unfinished")
    actions = ["revoke_selected"]

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        fields = list(super().get_fields(request, obj))
        # The prefix is assigned on save; on the add form it would be an empty row.
        return fields if obj is not None else [field for field in fields if field != "prefix"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        fields = tuple(super().get_readonly_fields(request, obj))
        if obj is not None:
            # Messages belong to the owner: re-owning a key would hand it another owner's messages.
            fields += ("owner",)
        return fields

    @admin.action(description="Revoke selected API keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[APIKey]) -> None:
        revoked = queryset.filter(revoked=False).update(revoked=True)
        noun = "key" if revoked == 1 else "keys"
        self.message_user(request, f"Revoked {revoked} API {noun}.", messages.SUCCESS)


# --- Webhooks -------------------------------------------------------------------------------------


class WebhookEndpointForm(forms.ModelForm):
    class Meta:
        model = WebhookEndpoint
        fields = ("owner", "url", "description", "is_active")

    def clean_url(self) -> str:
        url = self.cleaned_data["url"]
        problem = webhooks.url_problem(url)
        if problem:
            raise forms.ValidationError(problem)
        return url


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    """Creating an endpoint shows its signing secret once, in a message; never after."""

    form = WebhookEndpointForm
    list_display = ("url", "owner", "is_active", "description", "created_at")
    list_filter = ("is_active",)
    search_fields = ("owner", "url")
    ordering = ("-created_at",)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        # Its deliveries carry the owner's messages: re-owning it would send them elsewhere.
        return ("owner",) if obj is not None else ()

    def save_model(self, request: HttpRequest, obj: WebhookEndpoint, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if not change:
            self.message_user(
                request,
                f"The signing secret of this endpoint is {obj.secret}. It is shown only now: give it to the receiver, which verifies every event with it.",
                messages.WARNING,
            )


class WebhookAttemptInline(admin.TabularInline):
    model = WebhookAttempt
    fields = ("attempted_at", "status_code", "duration_ms", "error")
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0  # no "add another" row

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    """Each delivery with every attempt's status code and time; "Redeliver" sends it again."""

    list_display = ("webhook_id", "event_type", "message", "endpoint", "status", "attempts", "last_status_code", "last_attempt_at", "next_attempt_at")
    list_filter = ("status", "event_type")
    list_select_related = ("endpoint", "job")
    search_fields = ("webhook_id", "job__message_id")
    search_help_text = "An exact webhook_id or message_id."
    ordering = ("-created_at", "-id")
    sortable_by = ()
    show_full_result_count = False
    paginator = CappedCountPaginator
    fields = ("webhook_id", "event_type", "message", "endpoint", "status", "attempts", "last_status_code", "last_error", "last_attempt_at", "next_attempt_at", "give_up_at", "delivered_at", "created_at")
    readonly_fields = fields
    inlines = (WebhookAttemptInline,)
    actions = ["redeliver_selected"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_redeliver_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("messaging.change_webhookdelivery"))

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery], search_term: str) -> tuple[QuerySet[WebhookDelivery], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(Q(webhook_id=term) | Q(job__message_id=term)), False

    @admin.display(description="message")
    def message(self, obj: WebhookDelivery) -> str:
        return obj.job.message_id

    @admin.action(description="Redeliver selected webhook deliveries", permissions=["redeliver"])
    def redeliver_selected(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        count = webhooks.redeliver(queryset.values_list("pk", flat=True))
        noun = "delivery" if count == 1 else "deliveries"
        self.message_user(request, f"{count} {noun} will be sent again now, with the same webhook-id.", messages.SUCCESS)
