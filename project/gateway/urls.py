"""URLs of the demo gateway. Served under ASGI (``project.asgi`` sets ``GATEWAY_ASGI``), the
chat view runs in a bounded pool of threads and streams on the event loop (see
``project.gateway.threads``)."""

from django.conf import settings
from django.urls import path

from project.gateway import views
from project.gateway.threads import in_pool

chat = views.ChatCompletionsView.as_view()
if settings.GATEWAY.get("ASGI"):
    chat = in_pool(chat)

urlpatterns = [
    path("v1/chat/completions", chat, name="chat-completions"),
]
