//! Shapes many answers share, described in the OpenAPI document.

use serde::Serialize;
use utoipa::ToSchema;

/// Something done; what it was.
#[derive(Serialize, ToSchema)]
pub struct Done {
    pub message: String,
}

impl Done {
    pub fn new(message: impl Into<String>) -> Self {
        Done {
            message: message.into(),
        }
    }
}

/// Where a page is in the whole list.
#[derive(Serialize, ToSchema)]
pub struct Pagination {
    pub page: i64,
    pub limit: i64,
    pub total: i64,
    pub total_pages: i64,
}

impl Pagination {
    pub fn new(page: i64, limit: i64, total: i64) -> Self {
        Pagination {
            page,
            limit,
            total,
            total_pages: (total + limit - 1) / limit,
        }
    }
}
