"""The admin: staff only; list, search and filters that scale; cancel; secrets never shown; API keys."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.contrib import admin as django_admin
from django.contrib.auth.models import Permission, User
from django.contrib.messages import get_messages
from django.db import connection
from django.http import HttpResponse
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework_api_key.models import APIKey as LibraryAPIKey

from messaging import admin as messaging_admin
from messaging import jobs, runner
from messaging.models import APIKey, MessageEvent, MessageJob
from tests.conftest import RUNS_THE_WORKER, VALID_REQUEST

LIST = "/admin/messaging/messagejob/"
ASYNC = "/v1/messages/async"

TOOL_SECRET = "postgres://app:tool-context-password-4711@db.internal/orders"
MCP_TOKEN = "mcp-token-sk-live-0d2f9a81c3"
SECRET_REQUEST: dict[str, Any] = {
    **VALID_REQUEST,
    "correlation_id": "order-secret",
    "tool_context": [{"type": "connection", "dsn": TOOL_SECRET}],
    "mcp_servers": [
        {"type": "url", "url": "https://mcp.example.com/sse", "name": "orders", "authorization_token": MCP_TOKEN}
    ],
}


@pytest.fixture
def superuser(db: None) -> User:
    return User.objects.create_superuser("root", "root@example.com", "pw")


@pytest.fixture
def staff(superuser: User) -> Client:
    client = Client()
    client.force_login(superuser)
    return client


def viewer_client() -> Client:
    """Staff who may look at messages but hold no change (cancel) permission."""
    user = User.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_messagejob"))
    client = Client()
    client.force_login(user)
    return client


def accept(api: APIClient, **fields: Any) -> MessageJob:
    response = api.post(ASYNC, {**VALID_REQUEST, **fields}, format="json")
    assert response.status_code == 202, response.content
    return MessageJob.objects.get(message_id=response.json()["message_id"])


def change_url(job: MessageJob) -> str:
    return f"{LIST}{job.pk}/change/"


def cancel_url(job: MessageJob) -> str:
    return f"{LIST}{job.pk}/cancel/"


def listed_ids(response: HttpResponse) -> set[str]:
    """The message_ids in the change list's rows."""
    return set(re.findall(r'<th class="field-message_id"><a href="[^"]+">([^<]+)</a>', response.content.decode()))


def flash(response: HttpResponse) -> list[tuple[str, str]]:
    return [(message.level_tag, str(message)) for message in get_messages(response.wsgi_request)]


def cancelled_events(job: MessageJob) -> list[dict[str, Any]]:
    return [data for data in job.events.values_list("data", flat=True) if data.get("status") == "cancelled"]


class TestAccess:
    def test_it_sends_anonymous_and_non_staff_users_to_the_login_page(self, db: None) -> None:
        member = Client()
        member.force_login(User.objects.create_user("member", password="pw"))

        for client in (Client(), member):
            response = client.get(LIST)
            assert response.status_code == 302
            assert response["Location"].startswith("/admin/login/")

    def test_it_shows_the_list_to_staff(self, staff: Client, alice: APIClient) -> None:
        job = accept(alice)

        response = staff.get(LIST)

        assert response.status_code == 200
        assert listed_ids(response) == {job.message_id}

    def test_it_offers_no_add_and_no_edit_of_messages(self, staff: Client, alice: APIClient) -> None:
        job = accept(alice, priority=3)

        assert staff.get(f"{LIST}add/").status_code == 403
        page = staff.get(change_url(job)).content.decode()
        assert 'name="_save"' not in page
        assert staff.post(change_url(job), {"priority": "9", "status": "completed"}).status_code == 403
        job.refresh_from_db()
        assert (job.priority, job.status) == (3, "pending")

    def test_it_lets_only_superusers_delete_messages(self, staff: Client, alice: APIClient) -> None:
        job = accept(alice)
        viewer = viewer_client()

        assert viewer.post(f"{LIST}{job.pk}/delete/", {"post": "yes"}).status_code == 403
        confirmation = staff.get(f"{LIST}{job.pk}/delete/")
        assert confirmation.status_code == 200
        assert job.message_id in confirmation.content.decode()
        staff.post(f"{LIST}{job.pk}/delete/", {"post": "yes"})

        assert not MessageJob.objects.filter(pk=job.pk).exists()
        assert not MessageEvent.objects.filter(job_id=job.pk).exists()


class TestList:
    @RUNS_THE_WORKER
    def test_it_shows_status_model_priority_owner_created_and_duration(self, staff: Client, alice: APIClient) -> None:
        done = accept(alice, priority=9)
        runner.run_one()
        running = accept(alice, priority=8)
        jobs.claim_next()
        waiting = accept(alice, model="echo-slow", priority=2)
        done.refresh_from_db()
        MessageJob.objects.filter(pk=done.pk).update(finished_at=done.started_at + timedelta(seconds=1.5))

        page = staff.get(LIST).content.decode()

        def row(job: MessageJob) -> str:
            start = page.index(f">{job.message_id}</a>")
            return page[start : page.index("</tr>", start)]

        assert 'class="field-status">completed<' in row(done)
        assert 'class="field-duration">1.50 s<' in row(done)
        assert 'class="field-status">processing<' in row(running)
        assert 'class="field-duration">running<' in row(running)
        assert 'class="field-model">echo-slow<' in row(waiting)
        assert 'class="field-priority">2<' in row(waiting)
        assert 'class="field-owner">alice<' in row(waiting)
        assert 'class="field-duration">—<' in row(waiting)
        assert f'class="field-created">{waiting.created_at:%Y-%m-%d %H:%M:%S}<' in row(waiting)

    def test_it_lists_the_newest_first(self, staff: Client, alice: APIClient) -> None:
        first, second, third = accept(alice), accept(alice), accept(alice)

        page = staff.get(LIST).content.decode()

        positions = [page.index(job.message_id) for job in (third, second, first)]
        assert positions == sorted(positions)

    def test_it_never_counts_the_whole_table(self, staff: Client, alice: APIClient, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(messaging_admin.CappedCountPaginator, "cap", 3)
        monkeypatch.setattr(messaging_admin.MessageJobAdmin, "list_per_page", 2)
        for _ in range(5):
            accept(alice)

        with CaptureQueriesContext(connection) as queries:
            response = staff.get(LIST)

        counts = [query["sql"] for query in queries if "COUNT(" in query["sql"].upper()]
        assert counts, "the list counts its rows somehow"
        assert all("LIMIT 4" in sql for sql in counts), counts
        page = response.content.decode()
        assert "more than 3 messages" in page
        assert "Select all messages (more than 3)" in page

    def test_it_counts_a_short_list_exactly(self, staff: Client, alice: APIClient) -> None:
        accept(alice)
        accept(alice)

        assert "2 messages" in staff.get(LIST).content.decode()


class TestSearch:
    def test_it_finds_a_message_by_its_exact_message_id(self, staff: Client, alice: APIClient, bob: APIClient) -> None:
        wanted = accept(alice)
        accept(alice)
        accept(bob)

        assert listed_ids(staff.get(LIST, {"q": wanted.message_id})) == {wanted.message_id}

    def test_it_finds_every_message_with_a_correlation_id(self, staff: Client, alice: APIClient, bob: APIClient) -> None:
        one = accept(alice, correlation_id="order-42")
        two = accept(bob, correlation_id="order-42")
        accept(alice, correlation_id="order-421")
        accept(alice)

        assert listed_ids(staff.get(LIST, {"q": " order-42 "})) == {one.message_id, two.message_id}

    def test_it_matches_whole_values_only(self, staff: Client, alice: APIClient) -> None:
        job = accept(alice, correlation_id="order-42")

        assert listed_ids(staff.get(LIST, {"q": job.message_id[:-3]})) == set()
        assert listed_ids(staff.get(LIST, {"q": "ORDER-42"})) == set()
        assert listed_ids(staff.get(LIST, {"q": "order"})) == set()

    def test_it_searches_with_exact_lookups_that_the_indexes_serve(self, staff: Client, alice: APIClient) -> None:
        accept(alice, correlation_id="order-42")

        with CaptureQueriesContext(connection) as queries:
            staff.get(LIST, {"q": "order-42"})

        searches = [query["sql"] for query in queries if "order-42" in query["sql"]]
        assert searches
        for sql in searches:
            assert " LIKE " not in sql.upper() and "UPPER(" not in sql.upper(), sql


class TestFilters:
    @RUNS_THE_WORKER
    def test_it_filters_by_status(self, staff: Client, alice: APIClient) -> None:
        done = accept(alice, priority=9)
        runner.run_one()
        waiting = accept(alice)

        assert listed_ids(staff.get(LIST, {"status__exact": "completed"})) == {done.message_id}
        assert listed_ids(staff.get(LIST, {"status__exact": "pending"})) == {waiting.message_id}

    def test_it_filters_by_model_from_the_configured_models(self, staff: Client, alice: APIClient) -> None:
        slow = accept(alice, model="echo-slow")
        accept(alice, model="echo")

        page = staff.get(LIST).content.decode()
        assert "?model=echo-slow" in page and "?model=echo" in page
        assert listed_ids(staff.get(LIST, {"model": "echo-slow"})) == {slow.message_id}

    def test_it_filters_by_date(self, staff: Client, alice: APIClient) -> None:
        old = accept(alice)
        recent = accept(alice)
        MessageJob.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=30))
        today = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)

        page = staff.get(LIST).content.decode()
        assert "Past 7 days" in page
        past_week = {
            "created_at__gte": (today - timedelta(days=7)).isoformat(),
            "created_at__lt": (today + timedelta(days=1)).isoformat(),
        }
        assert listed_ids(staff.get(LIST, past_week)) == {recent.message_id}

    def test_it_combines_a_filter_with_a_search(self, staff: Client, alice: APIClient) -> None:
        job = accept(alice, correlation_id="order-7")

        assert listed_ids(staff.get(LIST, {"q": "order-7", "status__exact": "pending"})) == {job.message_id}
        assert listed_ids(staff.get(LIST, {"q": "order-7", "status__exact": "completed"})) == set()


class TestCancelSelected:
    @RUNS_THE_WORKER
    def test_it_cancels_pending_and_processing_messages_and_leaves_finished_ones(self, staff: Client, alice: APIClient) -> None:
        done = accept(alice, priority=10)
        runner.run_one()
        running = accept(alice, priority=9, correlation_id="order-9")
        jobs.claim_next()
        waiting = accept(alice, priority=1)
        selected = [done, running, waiting]

        response = staff.post(LIST, {"action": "cancel_selected", "_selected_action": [job.pk for job in selected]})

        assert response.status_code == 302
        for job in selected:
            job.refresh_from_db()
        assert (done.status, running.status, waiting.status) == ("completed", "cancelled", "cancelled")
        assert cancelled_events(running) == [{"type": "status", "status": "cancelled", "correlation_id": "order-9"}]
        assert cancelled_events(waiting) == [{"type": "status", "status": "cancelled"}]
        assert cancelled_events(done) == []
        assert ("success", "Cancelled 2 messages. Messages that had already finished were left as they were.") in flash(response)

    def test_it_cancels_across_all_pages(self, staff: Client, alice: APIClient) -> None:
        waiting = [accept(alice) for _ in range(3)]

        staff.post(LIST, {"action": "cancel_selected", "select_across": "1", "_selected_action": [waiting[0].pk]})

        assert set(MessageJob.objects.values_list("status", flat=True)) == {"cancelled"}

    @RUNS_THE_WORKER
    def test_it_says_so_when_nothing_could_be_cancelled(self, staff: Client, alice: APIClient) -> None:
        done = accept(alice)
        runner.run_one()

        response = staff.post(LIST, {"action": "cancel_selected", "_selected_action": [done.pk]})

        done.refresh_from_db()
        assert done.status == "completed"
        assert flash(response) == [("warning", "None of the selected messages was pending or processing; nothing was cancelled.")]

    def test_it_is_not_offered_to_staff_without_the_change_permission(self, alice: APIClient) -> None:
        job = accept(alice)
        viewer = viewer_client()

        assert "cancel_selected" not in viewer.get(LIST).content.decode()
        viewer.post(LIST, {"action": "cancel_selected", "_selected_action": [job.pk]})
        job.refresh_from_db()
        assert job.status == "pending"


class TestCancelButton:
    @RUNS_THE_WORKER
    def test_it_shows_the_button_for_a_pending_message_only(self, staff: Client, alice: APIClient) -> None:
        done = accept(alice, priority=9)
        runner.run_one()
        waiting = accept(alice)

        assert f'action="{cancel_url(waiting)}"' in staff.get(change_url(waiting)).content.decode()
        assert f'action="{cancel_url(done)}"' not in staff.get(change_url(done)).content.decode()

    def test_it_cancels_a_processing_message(self, staff: Client, alice: APIClient) -> None:
        job = accept(alice, correlation_id="order-5")
        jobs.claim_next()

        response = staff.post(cancel_url(job))

        assert response.status_code == 302
        assert response["Location"] == change_url(job)
        job.refresh_from_db()
        assert job.status == "cancelled"
        assert cancelled_events(job) == [{"type": "status", "status": "cancelled", "correlation_id": "order-5"}]
        assert flash(response) == [("success", f"Message {job.message_id} was cancelled.")]

    @RUNS_THE_WORKER
    def test_it_refuses_to_cancel_a_completed_message(self, staff: Client, alice: APIClient) -> None:
        job = accept(alice)
        runner.run_one()
        job.refresh_from_db()
        result, last_sequence = job.result, job.last_sequence

        response = staff.post(cancel_url(job), follow=True)

        job.refresh_from_db()
        assert (job.status, job.result, job.last_sequence) == ("completed", result, last_sequence)
        page = response.content.decode()
        assert f"Message {job.message_id} has already completed; it cannot be cancelled." in page
        assert 'class="error"' in page

    def test_it_only_cancels_on_post(self, staff: Client, alice: APIClient) -> None:
        job = accept(alice)

        assert staff.get(cancel_url(job)).status_code == 405
        job.refresh_from_db()
        assert job.status == "pending"

    def test_it_needs_the_csrf_token(self, superuser: User, alice: APIClient) -> None:
        job = accept(alice)
        client = Client(enforce_csrf_checks=True)
        client.force_login(superuser)

        assert client.post(cancel_url(job)).status_code == 403
        job.refresh_from_db()
        assert job.status == "pending"

        page = client.get(change_url(job)).content.decode()
        token = re.search(r'action="[^"]+/cancel/">\s*<input type="hidden" name="csrfmiddlewaretoken" value="([^"]+)"', page)
        assert token is not None
        assert client.post(cancel_url(job), {"csrfmiddlewaretoken": token.group(1)}).status_code == 302
        job.refresh_from_db()
        assert job.status == "cancelled"

    def test_it_refuses_staff_without_the_change_permission(self, alice: APIClient) -> None:
        job = accept(alice)
        viewer = viewer_client()

        assert f'action="{cancel_url(job)}"' not in viewer.get(change_url(job)).content.decode()
        assert viewer.post(cancel_url(job)).status_code == 403
        job.refresh_from_db()
        assert job.status == "pending"


class TestMessagePage:
    def test_it_shows_the_request_pretty_printed_with_secrets_redacted(self, staff: Client, alice: APIClient) -> None:
        job = accept(alice, **SECRET_REQUEST)

        page = staff.get(change_url(job)).content.decode()

        assert '<pre class="json">{\n  &quot;' in page
        assert '\n  &quot;messages&quot;: [\n    {\n      &quot;role&quot;: &quot;user&quot;,' in page
        assert '&quot;tool_context&quot;: &quot;[redacted]&quot;' in page
        assert '&quot;authorization_token&quot;: &quot;[redacted]&quot;' in page
        assert "https://mcp.example.com/sse" in page
        assert TOOL_SECRET not in page and "tool-context-password-4711" not in page
        assert MCP_TOKEN not in page
        assert 'name="secrets"' not in page

    def test_it_never_shows_secrets_in_the_list(self, staff: Client, alice: APIClient) -> None:
        job = accept(alice, **SECRET_REQUEST)

        for page in (staff.get(LIST), staff.get(LIST, {"q": job.message_id}), staff.get(LIST, {"q": "order-secret"})):
            assert job.message_id in page.content.decode()
            assert "tool-context-password-4711" not in page.content.decode()
            assert MCP_TOKEN not in page.content.decode()

    def test_it_never_renders_the_secrets_field_in_a_form(self, superuser: User) -> None:
        model_admin = django_admin.site._registry[MessageJob]
        request = Client().request().wsgi_request
        request.user = superuser

        form = model_admin.get_form(request)
        assert "secrets" not in form.base_fields
        assert "secrets" not in str(model_admin.get_fieldsets(request))

    @RUNS_THE_WORKER
    def test_it_escapes_what_it_prints(self, staff: Client, alice: APIClient) -> None:
        job = accept(alice, messages=[{"role": "user", "content": "<script>alert(1)</script>"}])
        runner.run_one()

        page = staff.get(change_url(job)).content.decode()

        assert "<script>alert(1)</script>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page

    @RUNS_THE_WORKER
    def test_it_shows_the_result_and_events_pretty_printed(self, staff: Client, alice: APIClient) -> None:
        job = accept(alice)
        runner.run_one()

        page = staff.get(change_url(job)).content.decode()

        assert "&quot;stop_reason&quot;: &quot;end_turn&quot;" in page
        assert '<table class="events">' in page
        assert "message_start" in page and "message_stop" in page
        assert "Showing the first" not in page

    def test_it_shows_a_bounded_number_of_events(self, staff: Client, alice: APIClient) -> None:
        job = accept(alice)
        MessageEvent.objects.bulk_create(
            MessageEvent(job=job, sequence=sequence, type="content_block_delta", data={"text": f"token-{sequence}-"})
            for sequence in range(2, 1001)
        )
        MessageJob.objects.filter(pk=job.pk).update(last_sequence=1000)

        page = staff.get(change_url(job)).content.decode()

        assert "Showing the first 200 of 1000 events; 800 more are not shown." in page
        assert "token-200-" in page
        assert "token-201-" not in page


class TestAPIKeys:
    def test_it_shows_only_our_api_key_model(self) -> None:
        assert django_admin.site.is_registered(APIKey)
        assert not django_admin.site.is_registered(LibraryAPIKey)

    def test_it_creates_a_key_for_an_owner_that_the_api_accepts_until_revoked(self, staff: Client) -> None:
        response = staff.post("/admin/messaging/apikey/add/", {"owner": "carol", "name": "carol's laptop"})

        assert response.status_code == 302
        shown = [text for level, text in flash(response) if level == "warning"]
        assert len(shown) == 1
        key = re.search(r"The API key for carol's laptop is: (\S+)\. ", shown[0]).group(1)  # type: ignore[union-attr]
        api_key = APIKey.objects.get(name="carol's laptop")
        assert api_key.owner == "carol"
        assert key not in (api_key.hashed_key, api_key.id)

        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
        message_id = api.post(ASYNC, VALID_REQUEST, format="json").json()["message_id"]
        assert MessageJob.objects.get(message_id=message_id).owner == "carol"

        staff.post(f"/admin/messaging/apikey/{api_key.pk}/change/", {"name": "carol's laptop", "revoked": "on"})

        api_key.refresh_from_db()
        assert api_key.revoked
        assert api.get("/v1/messages").status_code == 401

    def test_it_lists_and_searches_keys_by_owner(self, staff: Client, alice: APIClient, bob: APIClient) -> None:
        page = staff.get("/admin/messaging/apikey/", {"q": "bob"}).content.decode()

        assert 'class="field-owner">bob<' in page
        assert 'class="field-owner">alice<' not in page

    def test_it_does_not_let_a_key_change_owner(self, staff: Client, alice: APIClient) -> None:
        api_key = APIKey.objects.get(owner="alice")

        staff.post(f"/admin/messaging/apikey/{api_key.pk}/change/", {"owner": "mallory", "name": "alice"})

        api_key.refresh_from_db()
        assert api_key.owner == "alice"

    def test_it_revokes_selected_keys(self, staff: Client, alice: APIClient) -> None:
        api_key = APIKey.objects.get(owner="alice")

        staff.post("/admin/messaging/apikey/", {"action": "revoke_selected", "_selected_action": [api_key.pk]})

        assert alice.get("/v1/messages").status_code == 401
