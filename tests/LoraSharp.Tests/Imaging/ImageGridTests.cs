using LoraSharp.Imaging;
using SkiaSharp;

namespace LoraSharp.Tests.Imaging;

public class ImageGridTests
{
    static SKBitmap Solid(int w, int h, SKColor color)
    {
        var b = new SKBitmap(w, h);
        b.Erase(color);
        return b;
    }

    [Fact]
    public void Grid_has_label_bands_plus_rows_times_columns_of_cells()
    {
        var images = Enumerable.Range(0, 6).Select(i => Solid(32, 24, new SKColor((byte)(40 * i), 0, 0))).ToList();
        using var grid = ImageGrid.Compose(images, ["seed 1", "seed 2"], ["w 0.0", "w 0.5", "w 1.0"]);
        Assert.True(grid.Width > 3 * 32, "row label band missing");
        Assert.True(grid.Height > 2 * 24, "column label band missing");
        int labelW = grid.Width - 3 * 32, labelH = grid.Height - 2 * 24;
        // bottom-right cell shows the last image
        Assert.Equal(new SKColor(200, 0, 0), grid.GetPixel(labelW + 2 * 32 + 16, labelH + 24 + 12));
        Assert.Equal(new SKColor(0, 0, 0), grid.GetPixel(labelW + 16, labelH + 12));
        images.ForEach(i => i.Dispose());
    }

    [Fact]
    public void Grid_without_labels_is_exactly_the_cells()
    {
        var images = Enumerable.Range(0, 3).Select(_ => Solid(10, 20, SKColors.Blue)).ToList();
        using var grid = ImageGrid.Compose(images, [], ["a", "b", "c"]);
        Assert.Equal(30, grid.Width);
        using var column = ImageGrid.Compose(images, ["a", "b", "c"], []);
        Assert.Equal(60, column.Height);
        images.ForEach(i => i.Dispose());
    }

    [Fact]
    public void Grid_rejects_a_wrong_image_count()
    {
        using var one = Solid(4, 4, SKColors.Red);
        Assert.Throws<ArgumentException>(() => ImageGrid.Compose([one], ["a", "b"], ["c"]));
    }

    [Fact]
    public void Grid_encodes_to_png()
    {
        var images = Enumerable.Range(0, 4).Select(_ => Solid(16, 16, SKColors.Green)).ToList();
        using var grid = ImageGrid.Compose(images, ["r1", "r2"], ["c1", "c2"]);
        var png = PngImage.Encode(grid, (string?)"grid");
        using var back = SKBitmap.Decode(png);
        Assert.Equal((grid.Width, grid.Height), (back.Width, back.Height));
        images.ForEach(i => i.Dispose());
    }
}

public class ImageGridLabelTests
{
    [Fact]
    public void Labels_are_drawn_in_the_label_bands()
    {
        if (SKFontManager.Default.FontFamilyCount == 0) return; // a machine without any font draws no text
        using var img = new SKBitmap(64, 64);
        img.Erase(SKColors.White);
        using var grid = ImageGrid.Compose([img, img], ["row label"], ["A", "B"]);
        int labelW = grid.Width - 2 * 64, labelH = grid.Height - 64;
        bool Dark(int x0, int y0, int w, int h)
        {
            for (int y = y0; y < y0 + h; y++)
                for (int x = x0; x < x0 + w; x++)
                    if (grid.GetPixel(x, y).Red < 128) return true;
            return false;
        }
        Assert.True(Dark(labelW, 0, 2 * 64, labelH), "no column label pixels");
        Assert.True(Dark(0, labelH, labelW, 64), "no row label pixels");
    }
}
