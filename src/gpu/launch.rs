//! Grid and block sizes, as pure functions of the shape, dtype and SM count. Call sites never
//! compute a block size; every rule here is unit-tested on the CPU.

use crate::dtype::DType;
use crate::shape::Geometry;

/// Threads per block of every kernel (the CUDA side is compiled with `__launch_bounds__(256)`).
pub const BLOCK_THREADS: u32 = 256;
/// Warps per block.
const WARPS_PER_BLOCK: u64 = (BLOCK_THREADS / 32) as u64;
/// Blocks per SM a launch aims for: 8 x 256 threads fill an SM of H100 (2048 threads), which
/// keeps enough 16-byte loads in flight to saturate HBM.
pub const BLOCKS_PER_SM: u32 = 8;
/// Warp units each warp should get before another split pays for its partial and merge.
const MIN_UNITS_PER_WARP: u64 = 4;
/// Most blocks one channel's reduction is split over (the last block merges this many partials).
pub const MAX_SPLITS: u32 = 1024;
/// CUDA's limit on `gridDim.y` and `gridDim.z`.
const MAX_GRID_Y: u64 = 65_535;

/// Elements per 16-byte vector of `dtype`: the VEC of the kernels.
pub const fn vector_width(dtype: DType) -> u64 {
    16 / dtype.size_of() as u64
}

/// How a kernel walks the tensor: see `kernels/common.cuh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traversal {
    /// Channels-first with a spatial extent: warp units over (plane, chunk) of contiguous values.
    Planar,
    /// Channels-last and `(N, C)`: thread columns own `VEC` channels, rows are strided.
    Rows,
}

impl Traversal {
    /// The traversal for a geometry: rows when each channel's values are strided by `C`.
    pub fn of(g: &Geometry) -> Self {
        if g.inner > 1 {
            Traversal::Planar
        } else {
            Traversal::Rows
        }
    }
}

/// Grid, block and (for reductions) the number of blocks each channel is split over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// `gridDim`.
    pub grid: (u32, u32, u32),
    /// `blockDim`.
    pub block: (u32, u32, u32),
    /// Blocks per channel (group) of a split reduction; 1 for elementwise kernels.
    pub splits: u32,
}

impl Launch {
    pub(crate) fn config(&self) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig {
            grid_dim: self.grid,
            block_dim: self.block,
            shared_mem_bytes: 0,
        }
    }
}

/// Block shape `(bx, by)` of the rows traversal: `bx` thread columns of `VEC` channels each
/// (at most a warp), `by = 256 / bx` rows at a time.
pub fn rows_block(channels: u64, vec: u64) -> (u32, u32) {
    let columns = channels.div_ceil(vec);
    let bx = columns.next_power_of_two().min(32) as u32;
    (bx, BLOCK_THREADS / bx)
}

/// Warp units of one plane: chunks of 32 lanes x VEC values.
fn units_per_plane(inner: u64, vec: u64) -> u64 {
    inner.div_ceil(32 * vec)
}

/// Blocks per channel group so that the grid has about `BLOCKS_PER_SM` blocks per SM, but no
/// more than keep each warp busy with a few units, and few enough that the kernels' 32-bit
/// workspace offsets (`C * splits * 3` floats) cannot overflow.
fn splits_for(groups: u64, units_per_group: u64, channels: u64, sm_count: u32) -> u32 {
    let target = (sm_count * BLOCKS_PER_SM) as u64;
    let wanted = target.div_ceil(groups.max(1));
    let useful = units_per_group
        .div_ceil(WARPS_PER_BLOCK * MIN_UNITS_PER_WARP)
        .max(1);
    let addressable = u32::MAX as u64 / (PARTIAL_FLOATS * channels.max(1));
    wanted
        .min(useful)
        .min(addressable)
        .clamp(1, MAX_SPLITS as u64) as u32
}

/// Floats per channel and split of the largest partial (Welford: count, mean, m2).
const PARTIAL_FLOATS: u64 = 3;

/// A split per-channel reduction (statistics, backward sums).
///
/// Planar: grid `(splits, min(C, 65535))`, block rows looping over the channels `y, y + 65535,
/// ...` (CUDA caps `gridDim.y`). Rows: grid `(channel tiles, splits)` with [`rows_block`].
pub fn reduction(g: &Geometry, dtype: DType, sm_count: u32) -> Launch {
    let vec = vector_width(dtype);
    let channels = g.channels as u64;
    match Traversal::of(g) {
        Traversal::Planar => {
            let units = g.outer as u64 * units_per_plane(g.inner as u64, vec);
            let splits = splits_for(channels, units, channels, sm_count);
            Launch {
                grid: (splits, channels.min(MAX_GRID_Y) as u32, 1),
                block: (BLOCK_THREADS, 1, 1),
                splits,
            }
        }
        Traversal::Rows => {
            let (bx, by) = rows_block(channels, vec);
            let tiles = channels.div_ceil(bx as u64 * vec);
            // A row of a tile is one "unit" for one warp row of the block.
            let row_units = (g.outer as u64).div_ceil(by as u64) * WARPS_PER_BLOCK;
            let splits = splits_for(tiles, row_units, channels, sm_count).min(MAX_GRID_Y as u32);
            Launch {
                grid: (tiles as u32, splits, 1),
                block: (bx, by, 1),
                splits,
            }
        }
    }
}

/// An elementwise pass (normalize, dx).
///
/// Planar: a 1-D grid whose warps split the flat tensor's warp units (32 lanes x `VEC`
/// consecutive values, spanning planes: `kernels/common.cuh`, walk_flat). Rows: grid
/// `(channel tiles, row blocks)` with [`rows_block`].
pub fn elementwise(g: &Geometry, dtype: DType, sm_count: u32) -> Launch {
    let vec = vector_width(dtype);
    let target = (sm_count * BLOCKS_PER_SM) as u64;
    match Traversal::of(g) {
        Traversal::Planar => {
            let numel = (g.outer * g.channels * g.inner) as u64;
            let units = numel.div_ceil(32 * vec);
            let blocks = units.div_ceil(WARPS_PER_BLOCK).clamp(1, 2 * target);
            Launch {
                grid: (blocks as u32, 1, 1),
                block: (BLOCK_THREADS, 1, 1),
                splits: 1,
            }
        }
        Traversal::Rows => {
            let (bx, by) = rows_block(g.channels as u64, vec);
            let tiles = (g.channels as u64).div_ceil(bx as u64 * vec);
            let row_blocks = (g.outer as u64)
                .div_ceil(by as u64)
                .clamp(1, (2 * target).div_ceil(tiles).clamp(1, MAX_GRID_Y));
            Launch {
                grid: (tiles as u32, row_blocks as u32, 1),
                block: (bx, by, 1),
                splits: 1,
            }
        }
    }
}

/// A 1-D grid-stride launch over `n` independent elements (the fold).
pub fn flat(n: u64, sm_count: u32) -> Launch {
    let blocks = n
        .div_ceil(BLOCK_THREADS as u64)
        .clamp(1, (sm_count * BLOCKS_PER_SM) as u64);
    Launch {
        grid: (blocks as u32, 1, 1),
        block: (BLOCK_THREADS, 1, 1),
        splits: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::{Layout, TensorDesc};

    const H100_SMS: u32 = 132;

    fn geometry(dims: &[usize], layout: Layout) -> Geometry {
        TensorDesc::new(dims, layout).unwrap().geometry()
    }

    fn shapes() -> Vec<Geometry> {
        let mut all = Vec::new();
        for dims in [
            &[1usize, 1, 1][..],
            &[2, 1],
            &[4096, 1024],
            &[32, 2048, 7, 7],
            &[256, 2, 112, 112],
            &[1, 4, 64, 64, 64],
            &[7, 17, 33],
            &[1, 65_535, 3],
            &[2, 70_000, 3],
            &[3, 200_000],
            &[32, 64, 1024, 1100],
        ] {
            for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
                all.push(geometry(dims, layout));
            }
        }
        all
    }

    fn check_block(l: &Launch) {
        let threads = l.block.0 * l.block.1 * l.block.2;
        assert_eq!(threads, BLOCK_THREADS, "{l:?}");
        assert!(l.block.0.is_power_of_two() && l.block.0 <= 256);
        assert!(l.grid.0 >= 1 && l.grid.1 >= 1 && l.grid.1 as u64 <= MAX_GRID_Y);
    }

    #[test]
    fn reductions_cover_every_channel_and_fill_the_gpu() {
        for g in shapes() {
            for dtype in DType::ALL {
                let l = reduction(&g, dtype, H100_SMS);
                check_block(&l);
                assert!((1..=MAX_SPLITS).contains(&l.splits));
                assert!((g.channels as u64) * l.splits as u64 * PARTIAL_FLOATS <= u32::MAX as u64);
                match Traversal::of(&g) {
                    Traversal::Planar => {
                        assert_eq!(l.grid.1 as u64, (g.channels as u64).min(MAX_GRID_Y));
                        assert_eq!(l.grid.0, l.splits);
                    }
                    Traversal::Rows => {
                        let per_block = l.block.0 as u64 * vector_width(dtype);
                        assert!(l.grid.0 as u64 * per_block >= g.channels as u64);
                        assert!((l.grid.0 as u64 - 1) * per_block < g.channels as u64);
                        assert_eq!(l.grid.1, l.splits);
                    }
                }
                // Few channels with many values: the split must keep every SM busy.
                if g.channels <= 4 && g.per_channel() >= 1 << 20 {
                    let blocks = l.grid.0 * l.grid.1;
                    assert!(blocks >= H100_SMS, "{g:?} {dtype}: only {blocks} blocks");
                }
            }
        }
    }

    #[test]
    fn elementwise_launches_are_valid() {
        for g in shapes() {
            for dtype in DType::ALL {
                let l = elementwise(&g, dtype, H100_SMS);
                check_block(&l);
                if Traversal::of(&g) == Traversal::Rows {
                    let per_block = l.block.0 as u64 * vector_width(dtype);
                    assert!(l.grid.0 as u64 * per_block >= g.channels as u64);
                }
            }
        }
    }

    /// Channels-first elementwise grids count the flat tensor's units, not planes x chunks: a
    /// 7x7 layer's warps get full 512-byte units instead of one 98-byte plane each.
    #[test]
    fn planar_elementwise_grids_count_flat_units() {
        let small = geometry(&[2, 64, 7, 7], Layout::ChannelsFirst);
        // 6272 f16 values: 24.5 units of 256, one block of 8 warps covers 8 of them.
        assert_eq!(elementwise(&small, DType::F16, H100_SMS).grid, (4, 1, 1));
        assert_eq!(elementwise(&small, DType::F32, H100_SMS).grid, (7, 1, 1));
        let large = geometry(&[64, 2048, 7, 7], Layout::ChannelsFirst);
        let target = H100_SMS * BLOCKS_PER_SM;
        assert_eq!(
            elementwise(&large, DType::F32, H100_SMS).grid,
            (2 * target, 1, 1)
        );
    }

    #[test]
    fn rows_block_shapes() {
        assert_eq!(rows_block(2, 4), (1, 256));
        assert_eq!(rows_block(16, 8), (2, 128));
        assert_eq!(rows_block(17, 4), (8, 32));
        assert_eq!(rows_block(1024, 8), (32, 8));
    }

    #[test]
    fn traversal_follows_layout() {
        assert_eq!(
            Traversal::of(&geometry(&[8, 3, 5], Layout::ChannelsFirst)),
            Traversal::Planar
        );
        assert_eq!(
            Traversal::of(&geometry(&[8, 3, 5], Layout::ChannelsLast)),
            Traversal::Rows
        );
        assert_eq!(
            Traversal::of(&geometry(&[8, 3], Layout::ChannelsFirst)),
            Traversal::Rows
        );
    }

    /// The normalize kernels write a rows mask word from the lanes of one block: they need
    /// `bx * VEC >= 32` (a word's 32 channels inside one block) or a single channel tile
    /// (kernels/epilogue.cuh, store_mask). The elementwise launch must keep it for every C.
    #[test]
    fn rows_launches_keep_mask_words_inside_a_block() {
        for c in (1..=300).chain([511, 512, 513, 1000, 1001, 4096, 65_537]) {
            for dtype in DType::ALL {
                let desc = TensorDesc::new(&[3, c], Layout::ChannelsLast).unwrap();
                let g = desc.geometry();
                assert_eq!(Traversal::of(&g), Traversal::Rows);
                let l = elementwise(&g, dtype, 132);
                let vec = vector_width(dtype);
                let (bx, tiles) = (l.block.0 as u64, l.grid.0);
                assert!(bx * vec >= 32 || tiles == 1, "C = {c} {dtype}: {l:?}");
            }
        }
    }
}
