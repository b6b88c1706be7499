using LoraSharp.Demo;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Text;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Demo;

public class DemoTests
{
    static double StarRateOfDrawn(DemoShape shape, int count, int size)
    {
        var rng = new Random(3);
        int stars = 0;
        for (int i = 0; i < count; i++)
        {
            using var bmp = ShapeScenes.Render(ShapeScenes.Random(rng, shape), size);
            var rgb = ShapeScenes.RgbBytes(bmp).Select(b => (float)b).ToArray();
            if (StarDetector.Read(rgb, size, size).IsStar) stars++;
        }
        return (double)stars / count;
    }

    [Theory]
    [InlineData(32)]
    [InlineData(64)]
    public void Star_detector_finds_drawn_stars_and_rejects_the_pretraining_shapes(int size)
    {
        Assert.True(StarRateOfDrawn(DemoShape.Star, 60, size) >= 0.95);
        foreach (var s in ShapeScenes.PretrainingShapes)
            Assert.True(StarRateOfDrawn(s, 60, size) <= 0.02, $"{s} read as a star");
    }

    [Theory]
    [InlineData(32)]
    [InlineData(64)]
    public void Star_detector_sees_no_shape_in_a_flat_or_noisy_image(int size)
    {
        Assert.False(StarDetector.Read(new float[size * size * 3], size, size).HasShape);
        var rng = new Random(1);
        var noise = Enumerable.Range(0, size * size * 3).Select(_ => (float)rng.Next(256)).ToArray();
        Assert.False(StarDetector.Read(noise, size, size).IsStar);
        // Smooth colour noise (what an untrained decoder paints): random 4×4 colours, bilinear to size×size.
        int stars = 0;
        for (int n = 0; n < 100; n++)
        {
            using var scope = NewDisposeScope();
            var small = randn(1, 3, 4, 4, generator: new TorchSharp.torch.Generator((ulong)n + 1));
            var big = TorchSharp.torch.nn.functional.interpolate(small, [size, size], mode: InterpolationMode.Bilinear, align_corners: false).clamp(-1, 1);
            if (StarDetector.Read(big[0]).IsStar) stars++;
        }
        Assert.True(stars <= 3, $"{stars} of 100 smooth noise images read as stars");
    }

    /// <summary>Drawn 64×64 scenes whose background carries low-frequency colour blotches (what the small demo model paints around its figures).</summary>
    static double StarRateOnBlotchyBackgrounds(DemoShape shape, int count)
    {
        const int size = 64;
        var rng = new Random(11);
        int stars = 0;
        for (int i = 0; i < count; i++)
        {
            using var scope = NewDisposeScope();
            var scene = ShapeScenes.Random(rng, shape);
            using var bmp = ShapeScenes.Render(scene, size);
            var bytes = ShapeScenes.RgbBytes(bmp);
            var image = tensor(bytes.Select(b => b / 127.5f - 1f).ToArray()).reshape(size, size, 3).permute(2, 0, 1);
            var bg = ShapeScenes.Backgrounds[scene.Background];
            var bgColour = tensor(new[] { bg.Red / 127.5f - 1f, bg.Green / 127.5f - 1f, bg.Blue / 127.5f - 1f }).reshape(3, 1, 1);
            var isBackground = ((image - bgColour).abs().sum(0, keepdim: true) < 0.05).to_type(ScalarType.Float32);
            // blotches: 6×6 random colours upsampled, half strength, only on the background
            var blotches = nn.functional.interpolate(randn(1, 3, 6, 6, generator: new TorchSharp.torch.Generator((ulong)i + 100)), [size, size],
                mode: InterpolationMode.Bilinear, align_corners: false)[0] * 0.5;
            if (StarDetector.Read((image + blotches * isBackground).clamp(-1, 1)).IsStar) stars++;
        }
        return (double)stars / count;
    }

    [Fact]
    public void Star_detector_finds_stars_on_blotchy_backgrounds_and_still_rejects_the_pretraining_shapes()
    {
        double starRate = StarRateOnBlotchyBackgrounds(DemoShape.Star, 60);
        Assert.True(starRate >= 0.8, $"only {starRate:P0} of stars on blotchy backgrounds read as stars");
        foreach (var s in ShapeScenes.PretrainingShapes)
        {
            double rate = StarRateOnBlotchyBackgrounds(s, 60);
            Assert.True(rate <= 0.02, $"{rate:P0} of {s}s on blotchy backgrounds read as stars");
        }
    }

    [Fact]
    public void Captions_name_colour_shape_background_and_position()
    {
        var scene = new ShapeScene(DemoShape.Circle, "red", "blue", "left", 0.6f, 0, 0, 0);
        Assert.Equal("a red circle on a blue background, left", scene.Caption());
        Assert.Equal("a red sks star on a blue background, left", scene.Caption("sks star"));
        var (pixels, scenes) = ShapeScenes.Batch(50, 32, 5, ShapeScenes.PretrainingShapes);
        using var _ = pixels;
        Assert.Equal(new long[] { 50, 3, 32, 32 }, pixels.shape);
        Assert.DoesNotContain(scenes, s => s.Shape == DemoShape.Star);
        Assert.All(scenes, s => Assert.NotEqual(s.Colour, s.Background));
        var (again, scenes2) = ShapeScenes.Batch(50, 32, 5, ShapeScenes.PretrainingShapes);
        using var __ = again;
        Assert.True((pixels == again).all().item<bool>());
        Assert.Equal(scenes, scenes2);
    }

    [Fact]
    public void Demo_tokenizer_encodes_every_demo_word_as_one_token()
    {
        using var dir = new TempDir();
        int size = DemoTokenizer.Write(dir.Path, ShapeScenes.Words());
        var tok = ClipTokenizer.FromFolder(dir.Path);
        Assert.Equal(size, tok.VocabSize);
        Assert.Equal(size - 1, tok.EosId);
        foreach (var w in ShapeScenes.Words().SelectMany(w => w.Split(' ')))
            Assert.Single(tok.EncodeTokens(w));
        var ids = tok.Encode("a yellow sks star on a blue background, center");
        Assert.Equal(77, ids.Length);
        Assert.Equal("a yellow sks star on a blue background , center", tok.Decode(ids.Skip(1).Take(10)).Trim());
        // Text outside the demo vocabulary still tokenizes (byte symbols).
        Assert.NotEmpty(tok.EncodeTokens("zebra ünïcode"));
    }

    [Fact]
    public void Demo_model_single_file_loads_back_with_the_derived_sd1_config()
    {
        using var dir = new TempDir();
        manual_seed(4);
        var config = DemoModel.Config(300);
        using var model = new StableDiffusionModel(config);
        var path = dir.File("demo.safetensors");
        StableDiffusionCheckpoint.Save(model, path);
        using var file = StableDiffusionCheckpoint.Open(path);
        var derived = StableDiffusionCheckpoint.DeriveConfig(file);
        Assert.Equal(StableDiffusionFamily.SD1, derived.Family);
        Assert.Equal(config.Unet.BlockOutChannels, derived.Unet.BlockOutChannels);
        Assert.Equal(config.Unet.AttentionHeads, derived.Unet.AttentionHeads);
        Assert.Equal(config.Unet.DownBlockTypes, derived.Unet.DownBlockTypes);
        Assert.Equal(config.Unet.NormNumGroups, derived.Unet.NormNumGroups);
        Assert.Equal(config.Vae!.BlockOutChannels, derived.Vae!.BlockOutChannels);
        Assert.Equal(config.TextEncoder! with { }, derived.TextEncoder! with { });
        using var loaded = StableDiffusionModel.Load(path);
        var a = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, p) in loaded.named_parameters())
            Assert.True((a[name] == p).all().item<bool>(), name);
        Assert.Equal(a.Count, loaded.named_parameters().Count());
    }
}
