using SkiaSharp;

namespace LoraSharp.Imaging;

/// <summary>
/// An X/Y grid of images with row labels on the left and column labels on top (A1111's "X/Y/Z plot" layout), for
/// comparing LoRA weights, seeds or samplers. Cells are as large as the largest image; smaller ones are centered.
/// </summary>
public static class ImageGrid
{
    const float FontSize = 22f;
    const int Padding = 8;

    /// <summary>
    /// Composes <paramref name="images"/> (row-major, rows = rowLabels.Count, columns = columnLabels.Count) into one
    /// bitmap. Label lists may be empty: a single row or column without a label band. The caller owns the result.
    /// </summary>
    public static SKBitmap Compose(IReadOnlyList<SKBitmap> images, IReadOnlyList<string> rowLabels, IReadOnlyList<string> columnLabels)
    {
        int rows = Math.Max(1, rowLabels.Count), cols = Math.Max(1, columnLabels.Count);
        if (images.Count != rows * cols)
            throw new ArgumentException($"expected {rows}×{cols} = {rows * cols} images for {rowLabels.Count} row and {columnLabels.Count} column labels, got {images.Count}", nameof(images));
        if (images.Count == 0) throw new ArgumentException("no images", nameof(images));

        int cellW = images.Max(i => i.Width), cellH = images.Max(i => i.Height);
        using var typeface = SKTypeface.Default;
        using var font = new SKFont(typeface, FontSize);
        using var textPaint = new SKPaint { Color = SKColors.Black, IsAntialias = true };

        int labelW = rowLabels.Count == 0 ? 0 : (int)Math.Ceiling(rowLabels.Max(l => font.MeasureText(l))) + 2 * Padding;
        labelW = Math.Min(labelW, Math.Max(cellW, 64));
        int labelH = columnLabels.Count == 0 ? 0 : (int)Math.Ceiling(font.Spacing) + 2 * Padding;

        var grid = new SKBitmap(new SKImageInfo(labelW + cols * cellW, labelH + rows * cellH, SKColorType.Rgba8888, SKAlphaType.Opaque));
        using var canvas = new SKCanvas(grid);
        canvas.Clear(SKColors.White);

        for (int c = 0; c < columnLabels.Count; c++)
        {
            float x = labelW + c * cellW + cellW / 2f;
            float y = Padding - font.Metrics.Ascent;
            canvas.DrawText(Fit(columnLabels[c], font, cellW - Padding), x, y, SKTextAlign.Center, font, textPaint);
        }
        for (int r = 0; r < rowLabels.Count; r++)
        {
            float y = labelH + r * cellH + cellH / 2f - (font.Metrics.Ascent + font.Metrics.Descent) / 2;
            canvas.DrawText(Fit(rowLabels[r], font, labelW - Padding), Padding, y, SKTextAlign.Left, font, textPaint);
        }
        for (int r = 0; r < rows; r++)
        {
            for (int c = 0; c < cols; c++)
            {
                var img = images[r * cols + c];
                float x = labelW + c * cellW + (cellW - img.Width) / 2f;
                float y = labelH + r * cellH + (cellH - img.Height) / 2f;
                canvas.DrawBitmap(img, x, y);
            }
        }
        canvas.Flush();
        return grid;
    }

    /// <summary>Shortens a label with "…" until it fits <paramref name="width"/> pixels.</summary>
    static string Fit(string text, SKFont font, float width)
    {
        if (font.MeasureText(text) <= width || text.Length <= 1) return text;
        for (int n = text.Length - 1; n > 0; n--)
        {
            var s = text[..n] + "…";
            if (font.MeasureText(s) <= width) return s;
        }
        return "…";
    }
}
