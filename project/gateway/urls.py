"""URLs of the demo gateway."""

from django.urls import path

from project.gateway import views

urlpatterns = [
    path("v1/chat/completions", views.ChatCompletionsView.as_view(), name="chat-completions"),
]
