//! Kept responses read back and deleted: `GET` and `DELETE /v1/responses/{id}`, and `GET
//! /v1/responses/{id}/input_items` (OpenAI's list: `order`, `limit`, `after`).

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::not_found;
use crate::error::ApiError;
use crate::routes::AppState;

pub async fn get_response(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let stored = s.responses.get(&id).ok_or_else(|| not_found(&id))?;
    Ok(Json(stored.response.clone()))
}

pub async fn delete_response(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match s.responses.remove(&id) {
        true => Ok(Json(
            json!({"id": id, "object": "response", "deleted": true}),
        )),
        false => Err(not_found(&id)),
    }
}

/// The list's query, as OpenAI's.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `asc` (oldest first) or `desc` (the default).
    order: Option<String>,
    /// 1 to 100, default 20.
    limit: Option<usize>,
    /// The id of the item the page starts after.
    after: Option<String>,
    /// Which extra fields to include: none of them exist here.
    #[serde(default, rename = "include[]")]
    _include: Vec<String>,
}

pub async fn input_items(
    State(s): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let stored = s.responses.get(&id).ok_or_else(|| not_found(&id))?;
    Ok(Json(page(&stored.input, &q)?))
}

/// One page of `items`, as OpenAI's list object.
fn page(items: &[Value], q: &ListQuery) -> Result<Value, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_param("limit", "limit must be 1 to 100"));
    }
    let mut ordered: Vec<&Value> = match q.order.as_deref() {
        None | Some("desc") => items.iter().rev().collect(),
        Some("asc") => items.iter().collect(),
        Some(_) => return Err(ApiError::bad_param("order", "order must be asc or desc")),
    };
    if let Some(after) = &q.after {
        let at = (ordered.iter().position(|i| i["id"] == after.as_str()))
            .ok_or_else(|| ApiError::bad_param("after", format!("no input item {after:?}")))?;
        ordered.drain(..=at);
    }
    let has_more = ordered.len() > limit;
    ordered.truncate(limit);
    Ok(json!({
        "object": "list", "data": ordered, "has_more": has_more,
        "first_id": ordered.first().map(|i| &i["id"]), "last_id": ordered.last().map(|i| &i["id"]),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: usize) -> Vec<Value> {
        (0..n).map(|i| json!({"id": format!("i{i}")})).collect()
    }

    fn ids(v: &Value) -> Vec<&str> {
        (v["data"].as_array().unwrap().iter())
            .map(|i| i["id"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn pages_go_newest_first_unless_asked() {
        let q = ListQuery {
            limit: Some(2),
            ..ListQuery::default()
        };
        let p = page(&items(5), &q).unwrap();
        assert_eq!(ids(&p), ["i4", "i3"]);
        assert_eq!(
            (p["has_more"].as_bool(), p["last_id"].as_str()),
            (Some(true), Some("i3"))
        );
        let q = ListQuery {
            order: Some("asc".into()),
            limit: Some(2),
            after: Some("i2".into()),
            ..ListQuery::default()
        };
        let p = page(&items(5), &q).unwrap();
        assert_eq!(ids(&p), ["i3", "i4"]);
        assert_eq!(p["has_more"], false);
    }

    #[test]
    fn a_bad_query_names_its_field() {
        for (q, param) in [
            (
                ListQuery {
                    limit: Some(0),
                    ..ListQuery::default()
                },
                "limit",
            ),
            (
                ListQuery {
                    order: Some("up".into()),
                    ..ListQuery::default()
                },
                "order",
            ),
            (
                ListQuery {
                    after: Some("x".into()),
                    ..ListQuery::default()
                },
                "after",
            ),
        ] {
            assert_eq!(
                page(&items(3), &q).unwrap_err().param.as_deref(),
                Some(param)
            );
        }
    }
}
