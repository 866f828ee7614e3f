from fastapi import APIRouter

from app.api.v1.endpoints import chat, completions, history, stats, users

api_router = APIRouter(prefix="/api/v1")
api_router.include_router(users.router)
api_router.include_router(chat.router)
api_router.include_router(history.router)
api_router.include_router(stats.router)

# The OpenAI-compatible API lives at /v1, beside the native /api/v1.
openai_router = APIRouter()
openai_router.include_router(completions.router)
