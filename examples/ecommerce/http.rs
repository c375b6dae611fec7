//! The HTTP API (JSON). Every error is `{"error": "...", "field": "..."}`
//! (`field` when one input field is at fault).
//!
//! | route | service |
//! |---|---|
//! | `POST /orders`, `GET /orders/{id}` | order |
//! | `PUT /stock/{product_id}`, `GET /stock/{product_id}` | stock |
//! | `PUT /wallets/{customer_id}`, `GET /wallets/{customer_id}` | payment |
//! | `GET /health` | every process |

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::shop::{Cents, Item, Services, ShopApi};

type Shop = Arc<dyn ShopApi>;

/// A JSON error naming the field at fault.
struct ApiError {
    status: StatusCode,
    error: String,
    field: Option<String>,
}

impl ApiError {
    fn invalid(field: &str, error: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            error: error.into(),
            field: Some(field.to_owned()),
        }
    }

    fn not_found(what: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            error: format!("{what} not found"),
            field: None,
        }
    }
}

impl From<saga::Error> for ApiError {
    fn from(error: saga::Error) -> Self {
        Self {
            status: if error.is_retryable() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            },
            error: error.to_string(),
            field: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.error });
        if let Some(field) = self.field {
            body["field"] = json!(field);
        }
        (self.status, Json(body)).into_response()
    }
}

/// The body as a JSON object, or 400.
fn object(body: &Bytes) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "the body must be a JSON object".into(),
            field: None,
        }),
        Err(e) => Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            error: format!("malformed JSON: {e}"),
            field: None,
        }),
    }
}

fn text_field(map: &serde_json::Map<String, Value>, field: &str) -> Result<String, ApiError> {
    match map.get(field) {
        Some(Value::String(text)) if !text.trim().is_empty() => Ok(text.clone()),
        Some(_) => Err(ApiError::invalid(field, "must be a non-empty string")),
        None => Err(ApiError::invalid(field, "is missing")),
    }
}

fn money_field(map: &serde_json::Map<String, Value>, field: &str) -> Result<Cents, ApiError> {
    let text = text_field(map, field)?;
    Cents::parse(&text).ok_or_else(|| {
        ApiError::invalid(
            field,
            "must be an amount as a string with at most two decimals, like \"12.50\"",
        )
    })
}

async fn place_order(State(shop): State<Shop>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let map = object(&body)?;
    let customer_id = text_field(&map, "customer_id")?;
    let lines = match map.get("items") {
        Some(Value::Array(lines)) if !lines.is_empty() => lines,
        Some(_) => return Err(ApiError::invalid("items", "must be a non-empty array")),
        None => return Err(ApiError::invalid("items", "is missing")),
    };
    let mut items = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let Value::Object(line) = line else {
            return Err(ApiError::invalid(
                &format!("items[{i}]"),
                "must be an object",
            ));
        };
        let product_id = text_field(line, "product_id")
            .map_err(|e| ApiError::invalid(&format!("items[{i}].product_id"), e.error))?;
        let quantity = match line.get("quantity").and_then(Value::as_i64) {
            Some(q) if q > 0 => q,
            Some(_) => {
                return Err(ApiError::invalid(
                    &format!("items[{i}].quantity"),
                    "must be greater than 0",
                ));
            }
            None => {
                return Err(ApiError::invalid(
                    &format!("items[{i}].quantity"),
                    "must be a whole number",
                ));
            }
        };
        items.push(Item {
            product_id,
            quantity,
        });
    }
    let order_id = shop.place_order(&customer_id, items).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "order_id": order_id, "status": "PENDING" })),
    ))
}

async fn get_order(
    State(shop): State<Shop>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let view = shop
        .order(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("order {id}")))?;
    Ok(Json(view))
}

async fn put_stock(
    State(shop): State<Shop>,
    Path(product_id): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let map = object(&body)?;
    let available = match map.get("available").and_then(Value::as_i64) {
        Some(n) if n >= 0 => n,
        _ => {
            return Err(ApiError::invalid(
                "available",
                "must be a whole number, 0 or more",
            ));
        }
    };
    let unit_price = money_field(&map, "unit_price")?;
    shop.put_stock(&product_id, available, unit_price).await?;
    Ok(Json(
        json!({ "product_id": product_id, "available": available, "unit_price": unit_price.to_string() }),
    ))
}

async fn get_stock(
    State(shop): State<Shop>,
    Path(product_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let (available, reserved) = shop
        .stock_of(&product_id)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("product {product_id}")))?;
    Ok(Json(
        json!({ "available": available, "reserved": reserved }),
    ))
}

async fn put_wallet(
    State(shop): State<Shop>,
    Path(customer_id): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let balance = money_field(&object(&body)?, "balance")?;
    shop.put_wallet(&customer_id, balance).await?;
    Ok(Json(
        json!({ "customer_id": customer_id, "balance": balance.to_string() }),
    ))
}

async fn get_wallet(
    State(shop): State<Shop>,
    Path(customer_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let balance = shop
        .wallet_of(&customer_id)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("wallet {customer_id}")))?;
    Ok(Json(json!({ "balance": balance.to_string() })))
}

async fn health(State(shop): State<Shop>) -> impl IntoResponse {
    if shop.healthy().await {
        (StatusCode::OK, Json(json!({ "status": "ok" })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "database or broker unreachable" })),
        )
    }
}

/// The routes of the services this process runs.
pub(crate) fn router(shop: Shop, services: Services) -> Router {
    let mut router = Router::new().route("/health", get(health));
    if services.order {
        router = router
            .route("/orders", post(place_order))
            .route("/orders/{id}", get(get_order));
    }
    if services.stock {
        router = router.route("/stock/{product_id}", get(get_stock).put(put_stock));
    }
    if services.payment {
        router = router.route("/wallets/{customer_id}", get(get_wallet).put(put_wallet));
    }
    router.with_state(shop)
}

/// Serves until Ctrl-C (or SIGTERM), then stops the services cleanly.
pub(crate) async fn serve(
    shop: Shop,
    services: Services,
    listen: std::net::SocketAddr,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    let stopping = async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    };
    axum::serve(listener, router(Arc::clone(&shop), services))
        .with_graceful_shutdown(stopping)
        .await?;
    shop.stop().await;
    Ok(())
}
